"""The one trainer of CT2X's networks: settings (`config`), objectives (`recon_gan`) and the loop (`trainer`)."""
