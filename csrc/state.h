/* state.h: placeholder, filled in by the state work. */
#ifndef CONVSPLIT_STATE_H
#define CONVSPLIT_STATE_H
#include "convsplit.h"
#endif
