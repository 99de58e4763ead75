// train.cpp: placeholder, filled in by the train work.
#include "internal.h"
