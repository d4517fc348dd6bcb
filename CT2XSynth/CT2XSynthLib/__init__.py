"""Support code of the CT2XSynth module: Python dependencies and the few MRML calls around ct2x.vtk_bridge."""
