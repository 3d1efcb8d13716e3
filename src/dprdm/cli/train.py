"""`dprdm train`: train the generator on PUBLIC images, one stage at a time.

    dprdm train --stage autoencoder --data .dprdm-demo --out DIR --max-minutes 30
    dprdm train --stage denoiser --data .dprdm-demo --encoder demo --out DIR --max-minutes 60
    dprdm train --stage decoder --init-from GEN_DIR --out DIR ...  # the decoder reads the condition
    dprdm train ... --resume          # continue from DIR/<stage>.state.pt
    dprdm train --data MY_PUBLIC_FOLDER --data-is-public ...   # a folder must be declared public

DIR ends up a complete pipeline folder (``RetrievalDiffusionPipeline.from_pretrained(DIR)``).
All the logic lives in :mod:`dprdm.generation.training`; see ``docs/generator.md``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from dprdm.cli.output import JSON_OPTION, run_command


def train(
    data: Path = typer.Option(Path(".dprdm-demo"), "--data",
                              help="Demo root (only its PUBLIC splits are read) or a folder "
                                   "with a captions file (needs --data-is-public)."),
    data_is_public: bool = typer.Option(
        False, "--data-is-public", help="Acknowledge that every image in the --data folder is "
        "PUBLIC: the generator is released without privacy protection and can reproduce its "
        "training images. Not needed for the demo root (its manifest marks its public splits)."),
    caption_column: str | None = typer.Option(
        None, "--caption-column", help="The captions file's text column (default: 'caption', "
        "else 'text')."),
    out: Path = typer.Option(..., "--out", help="Output folder (the pipeline, logs, caches)."),
    stage: str = typer.Option("denoiser", "--stage",
                              help="autoencoder (first, public images only), denoiser, or "
                                   "decoder (optional, last: the --init-from generator's "
                                   "decoder learns to read the condition)."),
    encoder: str = typer.Option("demo", "--encoder",
                                help="Encoder name for dprdm.encoders.load_encoder "
                                     "(denoiser stage)."),
    steps: int = typer.Option(0, "--steps", min=0,
                              help="Stop at this total step count (0: no step limit)."),
    max_minutes: float = typer.Option(0.0, "--max-minutes", min=0.0,
                                      help="Stop after this many minutes of this run "
                                           "(0: no limit)."),
    batch_size: int = typer.Option(0, "--batch-size", min=0,
                                   help="0: 32 (autoencoder) / 64 (denoiser)."),
    lr: float = typer.Option(1e-3, "--lr", min=0.0, help="AdamW learning rate."),
    decay_start: int = typer.Option(0, "--decay-start", min=0,
                                    help="From this step the learning rate falls linearly to 0 "
                                         "at --steps (0: constant after warm-up)."),
    sigma_max: float = typer.Option(0.1, "--sigma-max", min=0.0,
                                    help="Training noise std per coordinate ~ U[0, this]."),
    cond_dropout: float = typer.Option(0.1, "--cond-dropout", min=0.0, max=1.0,
                                       help="Share of samples trained unconditionally."),
    text_query_share: float = typer.Option(
        0.5, "--text-query-share", min=0.0, max=1.0, help="Share of samples whose neighbours "
        "are found by their caption's text embedding (as generation finds them) instead of "
        "the image's own embedding."),
    random_neighbour_share: float = typer.Option(
        0.0, "--random-neighbour-share", min=0.0, max=1.0, help="Denoiser: share of samples "
        "whose condition averages k random images of the target's own source instead of its "
        "nearest neighbours (the style without the caption's content, which the text must then "
        "carry)."),
    text_only_share: float = typer.Option(
        0.0, "--text-only-share", min=0.0, max=1.0, help="Denoiser: share of the images of the "
        "public styles as they are whose condition is their caption's text alone (lam 0: the "
        "content branch of split guidance, taught on content-bearing real styles)."),
    public_splits: str = typer.Option(
        "", "--public-splits", help="Comma-separated public split folders of a demo root to "
        "train on (default: every split its manifest marks public)."),
    family_size: int = typer.Option(
        0, "--family-size", min=0, help="> 0: train on the public styles as they are plus this "
        "many procedural public styles (dprdm.data.style_family) instead of the 7 fixed "
        "augmentations."),
    family_images_per_source: int = typer.Option(64, "--family-images-per-source", min=17),
    real_share: float = typer.Option(
        0.0, "--real-share", min=0.0, max=1.0, help="Denoiser: > 0 draws this share of every "
        "batch from the public styles as they are, the rest from the restyled sources (0: every "
        "training image equally likely)."),
    min_snr_gamma: float = typer.Option(
        5.0, "--min-snr-gamma", min=0.0, help="Denoiser: Min-SNR loss weighting's gamma (Hang et "
        "al. 2023; 0 turns it off). A small gamma weighs the low-noise timesteps, where fine "
        "detail such as thin lines is drawn, less."),
    input_perturbation: float = typer.Option(
        0.0, "--input-perturbation", min=0.0, help="Denoiser: extra Gaussian noise of this "
        "scale added to the denoiser's input but not to its target (Ning et al. 2023): teaches "
        "it to correct the imperfect latents it reads when it generates (exposure bias)."),
    pixel_loss_weight: float = typer.Option(
        0.0, "--pixel-loss-weight", min=0.0, help="Denoiser: > 0 adds this weight times the L1 "
        "between the frozen decoder's drawing of the denoiser's x0 estimate and of the target "
        "latent, weighted by the timestep's signal share (thin lines are few latent numbers "
        "but many pixels). Costs a decoder pass per step."),
    condition_tokens: int = typer.Option(
        0, "--condition-tokens", min=0, help="Denoiser: > 0 adds a third condition path, this "
        "many tokens made from the condition that every pixel reads by cross-attention at each "
        "level. With --init-from a denoiser without them, they start at zero (the run starts as "
        "exactly the old denoiser)."),
    init_from: Path | None = typer.Option(
        None, "--init-from", help="A pipeline folder (e.g. the shipped demo generator) whose "
        "weights for this stage initialise the model (fine-tuning)."),
    latent_channels: int = typer.Option(
        0, "--latent-channels", min=0, help="Autoencoder stage: latent channels (0: the model's "
        "default, 4). With --init-from a narrower autoencoder, the latent is widened and starts "
        "as the old one."),
    decoder_only: bool = typer.Option(
        False, "--decoder-only", help="Autoencoder stage: train only the decoder of the "
        "--init-from autoencoder. Its encoder, latent space and scaling factor stay exactly as "
        "they were, so a denoiser trained on them still works with the new decoder."),
    decoder_blocks: str = typer.Option(
        "", "--decoder-blocks", help="With --decoder-only: residual blocks per decoder level, "
        "full resolution first (e.g. 3,3,2; each at least the old count). The new blocks start "
        "as the identity, so the run starts as exactly the old autoencoder."),
    decoder_pairs: int = typer.Option(
        8192, "--decoder-pairs", min=1, help="Decoder stage: how many of the denoiser's own "
        "drawings of training images (sampled back from mid noise) the decoder learns from."),
    decoder_clean_share: float = typer.Option(
        0.25, "--decoder-clean-share", min=0.0, max=1.0, help="Decoder stage: share of samples "
        "that read the image's own latent instead of the denoiser's drawing."),
    decoder_pair_starts: str = typer.Option(
        "300,450,600,750", "--decoder-pair-starts", help="Decoder stage: comma-separated "
        "timesteps (1-999) from which the denoiser draws the training images back."),
    threads: int = typer.Option(1, "--threads", min=1, help="torch CPU threads."),
    seed: int = typer.Option(0, "--seed"),
    save_every_minutes: float = typer.Option(5.0, "--save-every-minutes", min=0.1),
    resume: bool = typer.Option(False, "--resume", help="Continue from the saved state."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Train the generator's autoencoder or denoiser on public images."""

    def compute() -> dict:
        from dprdm.errors import InvalidParameterError
        from dprdm.generation.training import (TrainConfig, train_autoencoder,
                                               train_conditioned_decoder, train_denoiser)

        autoencoder_changes: dict = {}
        if latent_channels:
            autoencoder_changes["latent_channels"] = latent_channels
        if decoder_blocks.strip():
            autoencoder_changes["decoder_blocks"] = _counts("--decoder-blocks", decoder_blocks)
            if not decoder_only:
                raise InvalidParameterError("--decoder-blocks deepens the decoder of a "
                                            "--decoder-only run")
        extra: dict = {"autoencoder": autoencoder_changes} if autoencoder_changes else {}
        if condition_tokens:
            if stage != "denoiser":
                raise InvalidParameterError("--condition-tokens belongs to the denoiser stage")
            extra["denoiser"] = {"condition_tokens": condition_tokens}
        config = TrainConfig(stage=stage, data=str(data), data_is_public=data_is_public,
                             caption_column=caption_column, out=str(out), encoder=encoder,
                             steps=steps, max_minutes=max_minutes, batch_size=batch_size, lr=lr,
                             decay_start=decay_start,
                             sigma_max=sigma_max, cond_dropout=cond_dropout,
                             text_query_share=text_query_share,
                             random_neighbour_share=random_neighbour_share,
                             text_only_share=text_only_share, threads=threads,
                             seed=seed, save_every_minutes=save_every_minutes, resume=resume,
                             public_splits=tuple(p.strip() for p in public_splits.split(",")
                                                 if p.strip()),
                             family_size=family_size,
                             family_images_per_source=family_images_per_source,
                             real_share=real_share, min_snr_gamma=min_snr_gamma,
                             input_perturbation=input_perturbation,
                             pixel_loss_weight=pixel_loss_weight,
                             init_from=str(init_from) if init_from else "",
                             decoder_only=decoder_only, decoder_pairs=decoder_pairs,
                             decoder_clean_share=decoder_clean_share,
                             decoder_pair_starts=_counts("--decoder-pair-starts",
                                                         decoder_pair_starts),
                             extra=extra)
        config = config.resolved()
        run = {"autoencoder": train_autoencoder, "denoiser": train_denoiser,
               "decoder": train_conditioned_decoder}[config.stage]
        return run(config)

    run_command(as_json, f"dprdm train --stage {stage}", compute)


def _counts(flag: str, text: str) -> tuple[int, ...]:
    """'3,3,2' -> (3, 3, 2); anything else is a clean error naming the flag."""
    from dprdm.errors import InvalidParameterError

    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise InvalidParameterError(f"{flag} must be comma-separated whole numbers, got "
                                    f"{text!r}") from None
