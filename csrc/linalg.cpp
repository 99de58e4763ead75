// linalg.cpp: placeholder, filled in by the linalg work.
#include "internal.h"
