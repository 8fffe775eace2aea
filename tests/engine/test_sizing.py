"""A worker sizes its weight slots from the models it serves, and names what it cannot hold."""

from __future__ import annotations

from aegaeon.gpu_worker.sizing import KV_MIN_BYTES, engine_dtype, plan_memory, slot_need

from aegaeon.protocol import ModelInfo

GiB = 1 << 30


def model(name: str, weight_bytes: int, dtype: str = "float32") -> ModelInfo:
    esize = 4 if dtype == "float32" else 2
    return ModelInfo(name, "LlamaForCausalLM", "llama", f"/m/{name}", weight_bytes,
                     weight_bytes // esize, 2048, dtype)  # fmt: skip


def test_a_538_mb_checkpoint_gets_a_slot_that_holds_it_on_default_settings() -> None:
    # The new user's first request failed: 538 MB of weights against a 512 MiB slot.
    real = model("smol-135m", 538_060_032)
    plan = plan_memory([real, model("tiny", 15 << 20)], engine_dtype="float32", slots=2,
                       device_bytes=6 * GiB)  # fmt: skip
    assert plan.refused == {}
    assert plan.weight_budget_bytes // 2 >= slot_need(real, "float32") >= real.weight_bytes
    assert plan.arena_bytes - plan.weight_budget_bytes >= KV_MIN_BYTES


def test_a_bf16_checkpoint_on_a_float32_engine_reserves_room_for_its_conversion() -> None:
    bf16 = model("half", 1 * GiB, "bfloat16")
    assert slot_need(bf16, "float32") >= 1 * GiB + 2 * GiB
    assert slot_need(bf16, "bfloat16") < 1 * GiB + 4096


def test_a_model_too_large_for_the_device_is_refused_with_what_would_fit() -> None:
    plan = plan_memory([model("huge", 20 * GiB), model("small", GiB)], engine_dtype="float32",
                       slots=2, device_bytes=6 * GiB)  # fmt: skip
    assert set(plan.refused) == {"huge"}
    assert "more memory" in plan.refused["huge"] and "/m/huge" not in plan.refused["huge"]
    assert plan.weight_budget_bytes == 2 * slot_need(model("small", GiB), "float32")


def test_an_explicit_arena_keeps_half_for_weights_and_names_the_flag_to_raise() -> None:
    plan = plan_memory([model("big", 600 << 20)], engine_dtype="float32", slots=2,
                       device_bytes=6 * GiB, arena_bytes=2 * GiB)  # fmt: skip
    assert plan.arena_bytes == 2 * GiB and plan.weight_budget_bytes == GiB
    assert "--arena-bytes" in plan.refused["big"]


def test_with_no_registered_model_the_arena_is_split_in_half() -> None:
    plan = plan_memory([], engine_dtype="float32", slots=2, device_bytes=4 * GiB)
    assert (plan.arena_bytes, plan.weight_budget_bytes, plan.refused) == (4 * GiB, 2 * GiB, {})


def test_half_precision_checkpoints_are_served_in_their_own_dtype_on_the_cpu_too() -> None:
    bf16 = [model("a", GiB, "bfloat16"), model("b", GiB, "bfloat16")]
    assert engine_dtype(bf16, "auto", cuda=False) == "bfloat16"
    assert engine_dtype(bf16, "auto", cuda=True) == "bfloat16"
    fp16 = [model("c", GiB, "float16")]
    assert engine_dtype(fp16, "auto", cuda=False) == "float16"
    assert slot_need(fp16[0], engine_dtype(fp16, "auto", cuda=False)) < GiB + 4096  # no copy


def test_mixed_or_float32_fleets_get_the_device_default_and_a_flag_wins() -> None:
    mixed = [model("a", GiB, "bfloat16"), model("c", GiB, "float16")]
    assert engine_dtype(mixed, "auto", cuda=False) == "float32"  # both convert to it exactly
    assert engine_dtype(mixed, "auto", cuda=True) == "bfloat16"
    fp32 = [model("d", GiB)]
    assert engine_dtype(fp32, "auto", cuda=False) == "float32"
    assert engine_dtype(fp32, "auto", cuda=True) == "bfloat16"
    assert engine_dtype([], "auto", cuda=False) == "float32"
    assert engine_dtype(fp32, "float16", cuda=False) == "float16"
