/* inspect.h: placeholder, filled in by the inspect work. */
#ifndef CONVSPLIT_INSPECT_H
#define CONVSPLIT_INSPECT_H
#include "convsplit.h"
#endif
