"""pipelines/resnet.py's stage with the GPU's hardware JPEG decoder turned off (``hw_decoder_load=0``),
for the GPU tests: the mixed decoder splits a batch between the hardware decoder and its CUDA decoder
by load, and the two may differ in a few pixels, so a sample's checksum would depend on which decoder
took it. With the CUDA decoder only, the producer's pixels and the reference's are the same bits."""

from nvidia.dali import fn, types


def stage(jpegs, decoder_device):
    only_cuda = {"hw_decoder_load": 0.0} if decoder_device == "mixed" else {}
    images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB, **only_cuda)
    images = fn.resize(images, resize_shorter=256)
    return fn.crop(images, crop=(224, 224))
