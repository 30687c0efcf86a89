"""The memory API above the engine: requests checked and typed (one dataclass per call), writes handed to the engine,
reads routed between the stores with shadow comparisons, the policy guard, stores built from specs."""
