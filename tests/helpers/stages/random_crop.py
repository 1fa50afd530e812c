"""A stage with random operators (a random resized crop and a coin flip): it cannot be cached."""

from nvidia.dali import fn, types


def stage(jpegs, decoder_device):
    images = fn.decoders.image_random_crop(jpegs, device=decoder_device, output_type=types.RGB)
    images = fn.resize(images, size=[32, 32])
    return fn.flip(images, horizontal=fn.random.coin_flip())
