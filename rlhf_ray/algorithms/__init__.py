"""Pure tensor math for RLHF: losses, advantage estimators, KL estimators and controllers. No Ray, no I/O."""
