// state.cpp: placeholder, filled in by the state work.
#include "internal.h"
