"""The one trainer of CT2X's networks: settings (`config`), objectives (`recon_gan` for X-ray -> CT, `synth_gan` for
CT2X-GAN) and the loop (`trainer`)."""
