"""A deterministic stage that is slow on purpose (a large intermediate resize), so a test can
attach to, or kill, a producer while it fills its cache: decode, resize to 4096x4096, then to 32x32.
No random operator: it may be cached."""

from nvidia.dali import fn, types


def stage(jpegs, decoder_device):
    images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB)
    images = fn.resize(images, size=[4096, 4096])
    return fn.resize(images, size=[32, 32])
