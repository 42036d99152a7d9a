"""Settings shared by every compiled kernel in caravan."""

# One fastmath set for the whole project: reassociation and contraction let LLVM vectorize
# reductions; "nnan"/"ninf" are left out so NaN and Inf stay honest (stumpy does the same).
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
