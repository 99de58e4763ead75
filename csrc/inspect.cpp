// inspect.cpp: placeholder, filled in by the inspect work.
#include "internal.h"
