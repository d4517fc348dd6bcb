"""Support code of the CT2XReconstruct module: dependencies, film and CT nodes around ct2x, the background runner."""
