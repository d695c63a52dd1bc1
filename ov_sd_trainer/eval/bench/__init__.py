"""`ov-sd bench`: `variants` (the registry), `settings`, `prepare` (the folders), `measure`, `monitor`, `report`,
`run` (the entry point)."""
