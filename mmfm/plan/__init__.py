"""Planning large runs without hardware: per-rank memory, step time and MFU of a parallel layout, from the model's
spec and a HardwareConfig (docs/planning.md). `mmfm plan` ranks every layout that fits."""
