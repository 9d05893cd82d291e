"""Cross-attention conditioning end to end: condition dropout, guidance, every new config's smoke
run, and sampling from prompts / layouts / labels with the command line's errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import smoke_config
from ldm_jax import sample
from ldm_jax.conditioning import encoders
from ldm_jax.tasks.diffusion import DiffusionTask, make_sampler
from ldm_jax.training.trainer import train_and_evaluate

def tiny(name, **settings):
    return smoke_config(name, "async_checkpointing=false", "sampling.num_steps=2",
                        "eval_every_steps=0", "image_every_steps=0", **settings)


@pytest.fixture(scope="module")
def text_task():
    return DiffusionTask(tiny("ldm_digits_text.py"))


def test_condition_dropout_rate_and_null_condition(text_task):
    cond = {"tokens": jnp.asarray(text_task.condition.tokenize(["the digit 7"] * 20000))}
    null = text_task.condition.null(1)["tokens"][0]
    dropped = text_task.condition.drop(cond, jax.random.key(0), 0.25)["tokens"]
    is_null = np.all(np.asarray(dropped) == null, axis=1)
    assert abs(is_null.mean() - 0.25) < 0.015
    assert np.all(np.asarray(dropped)[~is_null] == np.asarray(cond["tokens"][0]))
    classes = encoders.ClassCondition("class", 11)
    labels = classes.drop({"label": jnp.arange(20000) % 10}, jax.random.key(1), 0.1)["label"]
    assert abs(float(jnp.mean(labels == 10)) - 0.1) < 0.01
    # The empty prompt is the null condition: [CLS] [SEP] then padding.
    assert list(null[:3]) == [101, 102, 0]


def test_guidance_scale_one_is_the_conditional_prediction(text_task):
    task = text_task
    state = task.init_state(jax.random.key(0))
    # Non-zero output layers, so conditional and unconditional predictions differ.
    params = jax.tree_util.tree_map(
        lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), state.params["model"])
    cond = {"tokens": jnp.asarray(task.condition.tokenize(["the digit 3", "number seven"]))}
    sampler = make_sampler(task.config, task.schedule, name="ddim", num_steps=3)
    rng = jax.random.key(5)
    guided_1 = task.sample_latents(params, rng, 2, cond=cond, sampler=sampler, guidance_scale=1.0)
    kw = task.unet_inputs(params, {}, cond)
    plain = sampler(lambda x, t: task._apply(params, x, t, kw), (2,) + task.latents.latent_shape, rng)
    np.testing.assert_array_equal(np.asarray(guided_1), np.asarray(plain))
    # Scale s: out_u + s (out_c - out_u), the unconditional half from the empty prompt.
    null_kw = task.unet_inputs(params, {}, jax.tree_util.tree_map(jnp.asarray, task.condition.null(2)))
    x = jax.random.normal(jax.random.key(3), (2,) + task.latents.latent_shape)
    t = jnp.array([10, 500])
    out_c, out_u = task._apply(params, x, t, kw), task._apply(params, x, t, null_kw)
    from ldm_jax.diffusion import samplers
    guided = samplers.guided_model_fn(lambda a, b, c: task._apply(params, a, b, c), kw, null_kw, 3.0)
    np.testing.assert_allclose(np.asarray(guided(x, t)), np.asarray(out_u + 3.0 * (out_c - out_u)),
                               atol=2e-5)
    assert float(jnp.max(jnp.abs(out_c - out_u))) > 1e-4


def _check_smoke_run(name, workdir, result, steps):
    assert result["step"] == steps and result["finite"] == 1.0, name
    config = DiffusionTask(tiny(name)).config
    assert config.model.use_spatial_transformer, name
    assert config.model.context_dim == config.conditioning.width == 32, name


# The digits configs and cin256_v2 are trained by the `trained` fixture below.
@pytest.mark.parametrize("name", ["text2img256.py", "txt2img_1p4b.py", "layout2img.py"])
def test_new_config_smoke_run(tmp_path, name):
    workdir = str(tmp_path / "run")
    result = train_and_evaluate(tiny(name, total_steps=2, checkpoint_every_steps=2,
                                     log_every_steps=1), workdir)
    _check_smoke_run(name, workdir, result, 2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One-step smoke runs of the digits text / layout configs and cin256_v2, sampled below."""
    runs = {}
    for name, kind in (("ldm_digits_text.py", "text"), ("ldm_digits_layout.py", "layout"),
                       ("cin256_v2.py", "class_crossattn")):
        workdir = str(tmp_path_factory.mktemp(kind))
        result = train_and_evaluate(tiny(name, total_steps=1, checkpoint_every_steps=1), workdir)
        _check_smoke_run(name, workdir, result, 1)
        runs[kind] = workdir
    return runs


def test_sample_from_prompts_layouts_and_labels(tmp_path, trained):
    out = tmp_path / "text"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("number seven\n\nthe digit 3\n")
    assert sample.main([f"--workdir={trained['text']}", f"--out={out}", "--num=3",
                        "--prompt=a handwritten one", f"--prompts_file={prompts}",
                        "--steps=2", "--batch_size=8"]) == 0
    npz = np.load(out / "samples.npz")
    assert npz["images"].shape[0] == 3 and npz["images"].dtype == np.uint8
    assert list(npz["prompts"]) == ["a handwritten one", "number seven", "the digit 3"]
    out = tmp_path / "layout"
    assert sample.main([f"--workdir={trained['layout']}", f"--out={out}", "--num=2",
                        "--layout=1:0.1,0.1,0.5,0.5;3:0.5,0.5,0.9,0.9", "--layout=",
                        "--steps=2", "--batch_size=8"]) == 0
    npz = np.load(out / "samples.npz")
    assert list(npz["layouts"]) == ["1:0.1,0.1,0.5,0.5;3:0.5,0.5,0.9,0.9", ""]
    out = tmp_path / "class"
    assert sample.main([f"--workdir={trained['class_crossattn']}", f"--out={out}", "--num=4",
                        "--labels=0,3", "--steps=2", "--batch_size=8"]) == 0
    assert list(np.load(out / "samples.npz")["labels"]) == [0, 3, 0, 3]


@pytest.mark.parametrize("kind,args,message", [
    ("class_crossattn", ["--prompt=a cat"], "--prompt/--prompts_file was given"),
    ("text", ["--labels=3"], "--labels was given"),
    ("text", ["--layout=1:0,0,1,1"], "--layout was given"),
    ("layout", ["--layout=1:0.5,0.1,0.4,0.9"], "x1"),
    ("layout", ["--layout=1:0.1,0.1,1.5,0.9"], "[0, 1]"),
    ("layout", ["--layout=12:0.1,0.1,0.5,0.9"], "12"),
    ("text", ["--prompts_file=/nonexistent/prompts.txt"], "/nonexistent/prompts.txt"),
])
def test_bad_conditions_are_one_line_errors(tmp_path, capsys, trained, kind, args, message):
    out = tmp_path / "out"
    code = sample.main([f"--workdir={trained[kind]}", f"--out={out}", "--num=2", "--steps=2",
                        "--batch_size=8"] + args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_long_prompt_is_truncated_with_a_warning(text_task):
    with pytest.warns(UserWarning, match="truncated"):
        tokens = text_task.condition.tokenize([" ".join(["seven"] * 40)])
    assert tokens.shape == (1, 16) and tokens[0, -1] == 102  # [SEP] kept at the end


def test_missing_tokenizer_file_names_it(tmp_path):
    config = tiny("ldm_digits_text.py", **{"conditioning.tokenizer_path": str(tmp_path / "vocab.txt")})
    with pytest.raises(Exception, match="vocab.txt"):
        DiffusionTask(config)


def test_prompt_to_a_class_model_in_the_library_is_a_condition_error():
    task = DiffusionTask(tiny("cin256_v2.py"))
    with pytest.raises(encoders.ConditionError, match="--prompt"):
        task.condition.request(2, prompts=["a dog"])
    cond = task.condition.request(3, labels="1,2")
    assert list(cond["label"]) == [1, 2, 1]


def test_layout_evaluation_crops_and_outside_mask():
    from ldm_jax.evaluation.conditioned import crop_boxes, outside_mask
    image = np.zeros((64, 64, 3), np.uint8)
    image[8:24, 32:48] = 200  # a bright square exactly in the box below
    boxes = np.array([[0.5, 0.125, 0.75, 0.375]], np.float32)
    crops = crop_boxes(image, boxes)
    assert crops.shape == (1, 32, 32, 3) and crops.min() == 200
    mask = outside_mask((64, 64), boxes)
    assert mask.sum() == 64 * 64 - 16 * 16 and image[mask].max() == 0
