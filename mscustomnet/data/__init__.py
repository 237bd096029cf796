"""The MSI dataset: COCO saliency filter, reference pools, layout maps, builder, curriculum and training Dataset.

The torch Dataset lives in ``mscustomnet.data.dataset``; nothing here imports torch, so the builder and its
worker processes stay light.
"""
