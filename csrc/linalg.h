/* linalg.h: placeholder, filled in by the linalg work. */
#ifndef CONVSPLIT_LINALG_H
#define CONVSPLIT_LINALG_H
#include "convsplit.h"
#endif
