"""The ResNet/ImageNet shared stage: decode, resize the shorter side to 256, centre crop 224x224.

Output: RGB uint8, HWC. Serve it with ``dalishare serve pipelines/resnet.py --data DIR``.
"""

from nvidia.dali import fn, types


def stage(jpegs, decoder_device):
    images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB)
    images = fn.resize(images, resize_shorter=256)
    return fn.crop(images, crop=(224, 224))  # crop_pos_x/y default to 0.5: the centre
