"""The shard loader's batches as the trainer's device sees them: uint8 ``HostImages`` finished
(normalised, erased, corrupt slots filled) on the CPU."""
from dsvit.data.device import finish_on_device


def finished(batches):
    """(images, labels, third) batches with the images as normalised float32 on the CPU."""
    for images, labels, third in batches:
        yield finish_on_device(images, "cpu"), labels, third
