"""MONAI Label tasks serving the models to the stock Slicer and OHIF plugins."""
