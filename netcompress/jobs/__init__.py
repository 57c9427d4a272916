"""The scripts' work: evaluate, train, rank, prune, compare, compress (its
loop and its report), export, predict. The top of the layers."""
