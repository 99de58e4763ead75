/* train.h: placeholder, filled in by the train work. */
#ifndef CONVSPLIT_TRAIN_H
#define CONVSPLIT_TRAIN_H
#include "convsplit.h"
#endif
