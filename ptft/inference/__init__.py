"""Using a trained model: `ptft predict`, `ptft embed`, `ptft export`.

    inputs.py      INPUT arguments (files, folders, globs, `-`) -> an ordered list of items
    decode.py      image file -> the model's uint8 pixels (torch-free: what decoding workers import)
    preprocess.py  the checkpoint's recorded preprocessing: pixels -> the model's float input
    stream.py      items -> decoded batches, in order, in parallel, in constant memory
    target.py      a run or checkpoint -> its model, ready for inference
    output.py      records (jsonl / csv) and files written under a temp name, renamed when complete
    predict.py     classes or reconstructions per input
    embed.py       encoder features per input, into .safetensors or .npy
    export.py      ONNX / TorchScript / pt2 files plus their preprocessing sidecar
    verify.py      an exported file's outputs against PyTorch's

Nothing here is imported by `ptft --help`: the CLI imports these modules inside its commands.
"""
