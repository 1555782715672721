"""Everything that runs on the host to feed batches.

`datasets` prepares and opens TFDS datasets (`python -m splitmask_jax.data
--dataset=NAME` prepares one); `image_folder` and `inaturalist2019` are builders for a
folder of the user's own images and for iNaturalist 2019; `input_pipeline` holds the
grain pipelines; `subsets` the class-balanced shares of a split; `randaugment` and
`photometric` the host-side augmentations.
"""
