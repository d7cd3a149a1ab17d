"""The Logger writes each record once to stdout, log.json and, when asked, TensorBoard."""
import glob
import json

from runtime.loops.hooks import Logger, TensorBoard


def test_records_reach_stdout_log_json_and_tensorboard(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    logger = Logger(str(tmp_path), tensorboard=TensorBoard(str(tmp_path), {"batch_size": 2}))
    logger.log("train", 5, {"loss": 0.5, "examples_per_sec": 3.0})
    logger.log("eval", 5, {"MeanDice": 0.75})
    assert capsys.readouterr().out.splitlines() == [
        "train step 5 | loss: 0.5 examples_per_sec: 3", "eval step 5 | MeanDice: 0.75"]
    with open(tmp_path / "log.json") as handle:
        assert [json.loads(line)["type"] for line in handle] == ["train", "eval"]
    (events,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    accumulator = EventAccumulator(events, size_guidance={"tensors": 0})
    accumulator.Reload()
    tags = set(accumulator.Tags()["tensors"])
    assert {"train/loss", "train/examples_per_sec", "eval/MeanDice"} <= tags
    (loss,) = accumulator.Tensors("train/loss")
    assert loss.step == 5
    assert Logger(str(tmp_path / "other"), enabled=False).path is None
