"""The data the commands run on: Fashion-MNIST (bundled test set, Debian's training set), the generated
cluttered canvases and moving-garment clips, ImageFolder and video-folder readers, the handling of unusable
images, and ``build_dataset``, which picks a model's data."""
