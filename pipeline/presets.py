"""Presets: model presets (``ddpm.preset``) and dataset presets (``dataset.name``).

A model preset is a set of guided-diffusion model flags plus the decoder blocks read by default
(``blocks: null``). Keys given in ``ddpm.model`` override the preset's flags one by one; an explicit
``blocks`` list wins over the preset's blocks.

Dataset presets: the built-in digits and the paper's six datasets (ddpm-segmentation's
experiments/<name>/ddpm.json and src/data_util.py). A preset fills every ``dataset`` key left null in
params.yaml; a key set explicitly wins.

Paper protocol notes: bedroom_28 uses class 0 (background) as its ignore label, so 28 classes are scored;
every paper preset turns classes covering fewer than 20 pixels of a *training* mask into ignore.
All four paper checkpoints share PAPER_MODEL_FLAGS (ddpm-segmentation's scripts/ddpm/train_interpreter.sh
MODEL_FLAGS); the paper reads blocks [5, 6, 7, 8, 12] at t = [50, 150, 250] (8448 features per pixel).
"""
from __future__ import annotations

# The built-in digits' model: a 32-channel UNet for 32 px canvases (image_size comes from dataset.image_size).
DIGITS_MODEL_FLAGS = {
    "num_channels": 32, "num_res_blocks": 2, "channel_mult": [1, 2, 2], "attention_resolutions": [8],
    "num_head_channels": 32, "use_scale_shift_norm": True, "resblock_updown": True, "learn_sigma": False,
    "dropout": 0.0,
}
# Chosen on the digits' val split (benchmarks/results/probe_*.json, by a block-set probe since replaced by
# analyses/representation_map.py, which scores single blocks x steps): blocks
# 0-3 at t = 50, 150, 250 scored val mIoU 0.395, against 0.382 for 0-4, 0.351 for 0-2 and 0.367 for all 9.
DIGITS_BLOCKS = [0, 1, 2, 3]

# lsun_bedroom.pt, ffhq.pt, lsun_cat.pt, lsun_horse.pt (552.8M parameters each). channel_mult [] = the
# 256 default (1, 1, 2, 2, 4, 4). use_fp16 as the paper ran them: float16 on CUDA, float32 on a CPU.
PAPER_MODEL_FLAGS = {
    "image_size": 256, "num_channels": 256, "num_res_blocks": 2, "channel_mult": [],
    "attention_resolutions": [32, 16, 8], "num_head_channels": 64, "use_scale_shift_norm": True,
    "resblock_updown": True, "learn_sigma": True, "dropout": 0.1, "use_fp16": True,
}
PAPER_BLOCKS = [5, 6, 7, 8, 12]
# t_steps stays an explicit list in params.yaml (dvc.yaml's `foreach: ${t_steps}` cannot read a preset);
# its default is this one.
PAPER_T_STEPS = [50, 150, 250]

# ddpm.preset -> model flags and default blocks (pipeline.config.ModelPreset lists the same names).
MODEL_PRESETS: dict[str, dict] = {
    "digits": {"model": DIGITS_MODEL_FLAGS, "blocks": DIGITS_BLOCKS},
    "adm256": {"model": PAPER_MODEL_FLAGS, "blocks": PAPER_BLOCKS},
}

DIGIT_CLASS_NAMES = ["background"] + [f"digit_{d}" for d in range(10)]

PRESETS: dict[str, dict] = {
    "digits": {"image_size": 32, "num_classes": 11, "class_names": DIGIT_CLASS_NAMES, "ignore_label": 255,
               "train_images": 50, "val_images": 50, "test_images": 50, "min_class_pixels": 0},
    "bedroom_28": {
        "image_size": 256, "num_classes": 29, "ignore_label": 0,
        "train_images": 40, "val_images": 0, "test_images": 20, "min_class_pixels": 20,
        "checkpoint": "lsun_bedroom.pt",
        "class_names": ["background", "bed", "bed***footboard", "bed***headboard", "bed***side rail", "carpet", "ceiling", "chandelier / ceiling fan blade", "curtain", "cushion", "floor", "table/nightstand/dresser", "table/nightstand/dresser***top", "picture / mirrow", "pillow", "lamp***column", "lamp***shade", "wall", "window", "curtain rod", "window***frame", "chair", "picture / mirror***frame", "plinth", "door / door frame", "pouf", "wardrobe", "plant", "table staff"],
    },
    "ffhq_34": {
        "image_size": 256, "num_classes": 34, "ignore_label": 255,
        "train_images": 20, "val_images": 0, "test_images": 20, "min_class_pixels": 20,
        "checkpoint": "ffhq.pt",
        "class_names": ["background", "head", "head***cheek", "head***chin", "head***ear", "head***ear***helix", "head***ear***lobule", "head***eye***bottom lid", "head***eye***eyelashes", "head***eye***iris", "head***eye***pupil", "head***eye***sclera", "head***eye***tear duct", "head***eye***top lid", "head***eyebrow", "head***forehead", "head***frown", "head***hair", "head***hair***sideburns", "head***jaw", "head***moustache", "head***mouth***inferior lip", "head***mouth***oral commissure", "head***mouth***superior lip", "head***mouth***teeth", "head***neck", "head***nose", "head***nose***ala of nose", "head***nose***bridge", "head***nose***nose tip", "head***nose***nostril", "head***philtrum", "head***temple", "head***wrinkles"],
    },
    "cat_15": {
        "image_size": 256, "num_classes": 15, "ignore_label": 255,
        "train_images": 30, "val_images": 0, "test_images": 20, "min_class_pixels": 20,
        "checkpoint": "lsun_cat.pt",
        "class_names": ["background", "back", "belly", "chest", "leg", "paw", "head", "ear", "eye", "mouth", "tongue", "nose", "tail", "whiskers", "neck"],
    },
    "horse_21": {
        "image_size": 256, "num_classes": 21, "ignore_label": 255,
        "train_images": 30, "val_images": 0, "test_images": 30, "min_class_pixels": 20,
        "checkpoint": "lsun_horse.pt",
        "class_names": ["background", "person", "back", "barrel", "bridle", "chest", "ear", "eye", "forelock", "head", "hoof", "leg", "mane", "muzzle", "neck", "nostril", "tail", "thigh", "saddle", "shoulder", "leg protection"],
    },
    "celeba_19": {
        "image_size": 256, "num_classes": 19, "ignore_label": 255,
        "train_images": 20, "val_images": 0, "test_images": 500, "min_class_pixels": 20,
        "checkpoint": "ffhq.pt",
        "class_names": ["background", "cloth", "ear_r", "eye_g", "hair", "hat", "l_brow", "l_ear", "l_eye", "l_lip", "mouth", "neck", "neck_l", "nose", "r_brow", "r_ear", "r_eye", "skin", "u_lip"],
    },
    "ade_bedroom_30": {
        "image_size": 256, "num_classes": 30, "ignore_label": 255,
        "train_images": 50, "val_images": 0, "test_images": 650, "min_class_pixels": 20,
        "checkpoint": "lsun_bedroom.pt",
        "class_names": ["wall", "bed", "floor", "table", "lamp", "ceiling", "painting", "windowpane", "pillow", "curtain", "cushion", "door", "chair", "cabinet", "chest", "mirror", "rug", "armchair", "book", "sconce", "plant", "wardrobe", "clock", "light", "flower", "vase", "fan", "box", "shelf", "television"],
    },
}

# ensemble.recipe -> the values of the ensemble keys it fills when they are null in params.yaml (a key set
# explicitly wins, as with the dataset presets). fast: chosen on the digits' val split (benchmarks/fit_vs_paper.py
# --select): batch 512 at lr 4e-3 for at most 4 epochs, plateau stopping, bf16 products; as good on val as the
# paper's fit in ~1/3.5 of its time. paper: ddpm-segmentation's train_interpreter.py: Adam at lr 1e-3, batch 64,
# at most 100 epochs, its batch-loss stopping rule (ensemble.batch_patience, ensemble.warmup_epochs), float32.
ENSEMBLE_RECIPES: dict[str, dict] = {
    "fast": {"lr": 4e-3, "batch_size": 512, "epochs": 4, "stopping": "plateau", "autocast": "bfloat16"},
    "paper": {"lr": 1e-3, "batch_size": 64, "epochs": 100, "stopping": "paper", "autocast": "none"},
}
RECIPE_KEYS = ("lr", "batch_size", "epochs", "stopping", "autocast")

