"""File formats: each reader turns files into TensorExtents. Formats know nothing of NUMA."""
