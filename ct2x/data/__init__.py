"""Data for CT2X's learned models: X2CT-GAN's convention, case preparation, datasets and augmentation."""
