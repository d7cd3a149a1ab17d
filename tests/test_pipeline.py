"""The tf.data pipeline (the reference's dataset/data_loader.py) on real TFRecord files."""
import numpy as np
import pytest
import tensorflow as tf

from dataset import transforms
from dataset import windows
from dataset.device_transform import finish_train_batch
from dataset.data_loader import BratsData, SyntheticTFData, split_folds
from dataset.synthetic import SyntheticData
from dataset.phantom.brats import write_brats_phantom
from dataset.preprocess_data import preprocess
from dataset.records import encode_example
from common.errors import UserError


def write_records(path, volumes, reference_format=False):
    """Write (x, y, mean, stdev) tuples; the reference format has only X, Y, mean and stdev."""
    with tf.io.TFRecordWriter(str(path)) as writer:
        for x, y, mean, stdev in volumes:
            if reference_format:
                f = {"X": tf.train.Feature(bytes_list=tf.train.BytesList(value=[x.tobytes()])),
                     "Y": tf.train.Feature(bytes_list=tf.train.BytesList(value=[y.tobytes()])),
                     "mean": tf.train.Feature(float_list=tf.train.FloatList(value=mean)),
                     "stdev": tf.train.Feature(float_list=tf.train.FloatList(value=stdev))}
                writer.write(tf.train.Example(features=tf.train.Features(feature=f)).SerializeToString())
            else:
                writer.write(encode_example(x, y, mean, stdev))


def random_volume(rng, shape):
    x = rng.integers(0, 256, size=shape + (4,), dtype=np.uint8)
    y = rng.integers(0, 4, size=shape, dtype=np.uint8)
    return x, y, [50.0, 60.0, 70.0, 80.0], [10.0, 11.0, 12.0, 13.0]


def small_dataset(root, n_files=5, per_file=2, shape=(40, 36, 33)):
    rng = np.random.default_rng(0)
    root.mkdir(exist_ok=True)
    for k in range(n_files):
        write_records(root / f"volume-{k}.tfrecord", [random_volume(rng, shape) for _ in range(per_file)])
    return str(root)


def finished(batch):
    """A compact training batch through the device transform, as NumPy (x, one-hot y)."""
    return tuple(np.asarray(t) for t in finish_train_batch(*batch))


def batches(dataset, n):
    return [finished(b) for b in dataset.take(n)]


def test_brats_shapes_from_reference_format_records(tmp_path):
    rng = np.random.default_rng(1)
    data = tmp_path / "brats"
    data.mkdir()
    write_records(data / "volume-0.tfrecord", [random_volume(rng, (240, 240, 155))], True)
    write_records(data / "volume-1.tfrecord", [random_volume(rng, (240, 240, 155))], True)
    write_records(data / "volume-2.tfrecord", [random_volume(rng, (240, 240, 155)) for _ in range(3)], True)
    loader = BratsData(str(data), batch_size=2, fold=2, num_folds=3, seed=0)
    assert loader.volume_shape == (240, 240, 155) and loader.n_eval == 3
    inputs, labels = next(iter(loader.train_dataset()))  # compact: uint8 crops and labels
    assert inputs["image"].shape == (2, 128, 128, 128, 4) and inputs["image"].dtype == tf.uint8
    assert labels.shape == (2, 128, 128, 128) and labels.dtype == tf.uint8
    assert inputs["flip"].shape == (2,) and inputs["factor"].shape == (2, 4)
    x, y = finished((inputs, labels))
    assert x.shape == (2, 128, 128, 128, 4) and x.dtype == np.float32
    assert y.shape == (2, 128, 128, 128, 4)
    np.testing.assert_array_equal(y.sum(-1), 1.0)  # one-hot
    evals = list(loader.eval_dataset())
    assert [b[0].shape[0] for b in evals] == [2, 1]  # every validation volume, last batch partial
    assert evals[0][0].shape == (2, 224, 224, 160, 4) and evals[0][1].shape == (2, 224, 224, 160, 4)
    tests = list(loader.test_dataset())
    assert [t.shape for t in tests] == [(2, 224, 224, 160, 4), (1, 224, 224, 160, 4)]


def test_folds_are_sorted_and_split_like_array_split(tmp_path):
    files = [f"volume-{k}.tfrecord" for k in (10, 2, 0, 1)]
    train, val = split_folds(sorted(files, key=lambda f: int(f[7:-9])), 0, 3)
    assert val == ["volume-0.tfrecord", "volume-1.tfrecord"]
    assert train == ["volume-2.tfrecord", "volume-10.tfrecord"]
    data = small_dataset(tmp_path / "d", n_files=11, per_file=1)
    (tmp_path / "d" / "notes.txt").write_text("not a record")
    loader = BratsData(data, batch_size=1, fold=1, num_folds=5)
    assert [f.rsplit("/", 1)[1] for f in loader.eval_files] == ["volume-3.tfrecord", "volume-4.tfrecord"]
    assert len(loader.train_files) == 9


def test_same_seed_same_stream_other_seed_differs(tmp_path):
    data = small_dataset(tmp_path / "d")
    first = batches(BratsData(data, 2, seed=11).train_dataset(), 4)
    again = batches(BratsData(data, 2, seed=11).train_dataset(), 4)
    other = batches(BratsData(data, 2, seed=12).train_dataset(), 4)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    assert any(not np.array_equal(a[0], c[0]) for a, c in zip(first, other))


def test_resumed_stream_continues_where_it_stopped(tmp_path):
    data = small_dataset(tmp_path / "d")
    whole = batches(BratsData(data, 2, seed=3).train_dataset(), 6)
    tail = batches(BratsData(data, 2, seed=3).train_dataset(start_step=4), 2)
    for a, b in zip(whole[4:], tail):
        np.testing.assert_array_equal(a[0], b[0])


def test_workers_read_disjoint_shards(tmp_path):
    data = small_dataset(tmp_path / "d", n_files=6, per_file=2)
    seen = []
    for worker in range(2):
        loader = BratsData(data, 1, fold=0, num_folds=3, seed=0, augment=False, worker_id=worker, num_workers=2)
        ds = tf.data.TFRecordDataset(loader.train_files).shard(2, worker)
        seen.append({r.numpy() for r in ds})
        assert len(batches(loader.train_dataset(), 1)) == 1
    assert len(seen[0]) == len(seen[1]) == 4 and not seen[0] & seen[1]


def test_one_process_of_two_devices_joins_the_streams_of_two_workers(tmp_path):
    # Batch i of a process feeding two devices is batch i of worker 0 then batch i of worker 1
    # (of one device each), from any step on: the data does not depend on the layout.
    data = small_dataset(tmp_path / "d", n_files=6, per_file=2)
    for start in (0, 3):
        joined = BratsData(data, 2, fold=0, num_folds=3, seed=5, worker_id=0, num_workers=2,
                           local_streams=2).train_dataset(start)
        workers = [BratsData(data, 1, fold=0, num_folds=3, seed=5, worker_id=k,
                             num_workers=2).train_dataset(start) for k in range(2)]
        for (x, y), *parts in zip(joined.take(4), *(w.take(4) for w in workers)):
            for key in x:
                np.testing.assert_array_equal(x[key], np.concatenate([p[0][key] for p in parts]))
            np.testing.assert_array_equal(y, np.concatenate([p[1] for p in parts]))
        assert not np.array_equal(parts[0][0]["image"], parts[1][0]["image"])


def hand_volume():
    d, h, w = 6, 5, 4
    x = np.arange(d * h * w * 2, dtype=np.float32).reshape(d, h, w, 2) + 1
    y = (np.arange(d * h * w).reshape(d, h, w) % 4).astype(np.uint8)
    return x, y


def test_random_crop_starts_are_uniform_in_range():
    x, y = hand_volume()
    starts = set()
    for i in range(200):
        cx, cy = transforms.random_crop(tf.constant(x), tf.constant(y), (4, 4, 4), tf.constant([i, 0]))
        cx = cx.numpy()
        d0, h0, w0 = np.argwhere(x[..., 0] == cx[0, 0, 0, 0])[0]
        np.testing.assert_array_equal(cx, x[d0:d0 + 4, h0:h0 + 4, w0:w0 + 4])
        np.testing.assert_array_equal(cy.numpy(), y[d0:d0 + 4, h0:h0 + 4, w0:w0 + 4])
        starts.add((d0, h0, w0))
    # [0, size - crop): 6-4 -> {0, 1}, 5-4 -> {0}, 4-4 -> {0} (a crop equal to the size starts at 0).
    assert starts == {(0, 0, 0), (1, 0, 0)}


def test_flip_and_brightness_are_drawn_half_the_time():
    draws = [transforms.draw_augmentation(tf.constant([i, 1]), tf.constant([i, 2]), 4, True)
             for i in range(100)]
    flips = sum(bool(f) for f, _, _ in draws)
    brightens = sum(bool(b) for _, b, _ in draws)
    assert 30 < flips < 70 and 30 < brightens < 70
    factors = np.stack([f.numpy() for _, _, f in draws])
    assert np.all((factors >= 0.9) & (factors <= 1.1)) and len(np.unique(factors)) == factors.size
    flip, brighten, _ = transforms.draw_augmentation(tf.constant([0, 1]), tf.constant([0, 2]), 4, False)
    assert not flip and not brighten


def test_device_transform_flips_zscores_and_brightens():
    x, y = hand_volume()
    image = np.stack([x, x]).astype(np.uint8)
    inputs = {"image": image, "mean": np.array([[3.0, 5.0]] * 2, np.float32),
              "stdev": np.array([[2.0, 4.0]] * 2, np.float32), "flip": np.array([False, True]),
              "brighten": np.array([True, False]), "factor": np.array([[0.95, 1.05]] * 2, np.float32)}
    fx, fy = finished((inputs, np.stack([y, y])))
    z = np.where(x > 0, (x - [3.0, 5.0]) / (np.array([2.0, 4.0]) + 1e-8), 0)
    np.testing.assert_allclose(fx[0], np.where(z > 0, z + [0.95, 1.05], z), rtol=1e-6)
    np.testing.assert_allclose(fx[1], z[:, ::-1], rtol=1e-6)
    np.testing.assert_array_equal(fy[0].argmax(-1), y)
    np.testing.assert_array_equal(fy[1].argmax(-1), y[:, ::-1])


def todays_train_transform(x, y, mean, stdev, seed, crop_shape):
    """The training transform as it ran on the host before the device transform (augment on)."""
    crop_seed, flip_seed, bright_seed = transforms._seeds(seed, 3)
    x, y = transforms.random_crop(x, y, crop_shape, crop_seed)
    flip = tf.random.stateless_uniform([], flip_seed) > 0.5
    x = tf.cond(flip, lambda: tf.reverse(x, [1]), lambda: x)
    y = tf.cond(flip, lambda: tf.reverse(y, [1]), lambda: y)
    x = transforms.zscore(tf.cast(x, tf.float32), mean, stdev)
    apply_seed, factor_seed = transforms._seeds(bright_seed, 2)
    factor = tf.random.stateless_uniform([x.shape[-1]], factor_seed, minval=0.9, maxval=1.1)
    apply = tf.random.stateless_uniform([], apply_seed) > 0.5
    x = tf.cond(apply, lambda: tf.where(x > 0, x + factor, x), lambda: x)
    return x, tf.one_hot(tf.cast(y, tf.int32), 4), bool(flip), bool(apply)


def test_device_transform_gives_what_the_host_transform_gave():
    x, y, mean, stdev = random_volume(np.random.default_rng(3), (40, 36, 33))
    x, y, mean, stdev = tf.constant(x), tf.constant(y), tf.constant(mean), tf.constant(stdev)
    seen = set()
    for index in range(12):
        seed = tf.constant([7, index], tf.int64)
        old_x, old_y, flip, apply = todays_train_transform(x, y, mean, stdev, seed, (32, 32, 32))
        inputs, labels = transforms.train_transform(x, y, mean, stdev, seed, (32, 32, 32), True)
        batch = tf.nest.map_structure(lambda t: t[None], (inputs, labels))
        new_x, new_y = finished(batch)
        np.testing.assert_allclose(new_x[0], old_x.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(new_y[0], old_y.numpy())
        seen.add((flip, apply))
    assert seen == {(False, False), (False, True), (True, False), (True, True)}


def test_zscore_and_eval_window():
    x = tf.constant([[[[0.0, 10.0]]]])
    out = transforms.zscore(x, tf.constant([1.0, 4.0]), tf.constant([2.0, 3.0])).numpy()
    np.testing.assert_allclose(out.ravel(), [0.0, 6.0 / (3.0 + 1e-8)])
    assert windows.eval_window((240, 240, 155)) == (224, 224, 160)
    assert windows.train_crop_shape((240, 240, 155)) == (128, 128, 128)
    assert windows.train_crop_shape((96, 80, 70)) == (96, 64, 64)
    vol = tf.reshape(tf.range(240 * 240 * 155, dtype=tf.int32), (240, 240, 155, 1))
    win = transforms.fit_window(vol, (224, 224, 160)).numpy()
    np.testing.assert_array_equal(win[:, :, :155, 0], vol.numpy()[8:232, 8:232, :, 0])
    assert np.all(win[:, :, 155:] == 0)
    np.testing.assert_array_equal(windows.window_array(vol.numpy(), (224, 224, 160)), win)
    np.testing.assert_array_equal(windows.unfit_window(win[..., 0], (240, 240, 155))[8:232, 8:232],
                                  vol.numpy()[8:232, 8:232, :, 0])


def test_synthetic_data_is_deterministic_with_and_without_tensorflow():
    plain = SyntheticData(1, seed=4)
    inputs, labels = next(plain.train_dataset())
    assert inputs["image"].dtype == labels.dtype == np.uint8 and labels.shape == (1, 128, 128, 128)
    x, y = finished((inputs, labels))
    assert x.shape == (1, 128, 128, 128, 4) and y.shape == (1, 128, 128, 128, 4) and x.dtype == np.float32
    np.testing.assert_array_equal(y.sum(-1), 1.0)
    stream = plain.train_dataset(start_step=1)
    np.testing.assert_array_equal(finished(next(stream))[0],
                                  batches(SyntheticTFData(1, seed=4).train_dataset(), 2)[1][0])
    (test,) = SyntheticTFData(2, seed=4).test_dataset()
    assert test.shape == (2, 64, 64, 64, 4) and float(tf.reduce_max(tf.abs(test))) <= 2.0
    (ex, ey), = SyntheticData(1, seed=4).eval_dataset()
    assert ex.shape == ey.shape == (1, 224, 224, 160, 4)
    assert not np.array_equal(finished(next(SyntheticData(1, seed=5).train_dataset()))[0], x)


def test_bad_data_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no \\*.tfrecord files"):
        BratsData(str(empty), 1)
    data = small_dataset(tmp_path / "d", n_files=3, per_file=2)
    with pytest.raises(UserError, match="no validation files"):
        BratsData(data, 1, fold=4, num_folds=5)
    path = tmp_path / "d" / "volume-1.tfrecord"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(UserError, match=f"{path}: corrupt or truncated"):
        BratsData(data, 1, fold=0, num_folds=3)


def test_phantom_to_batches_end_to_end(tmp_path):
    write_brats_phantom(str(tmp_path / "nifti"), 5, shape=(72, 70, 40), seed=1, workers=2)
    preprocess(str(tmp_path / "nifti"), str(tmp_path / "records"), vol_per_file=1, single_data_dir=True,
               seed=0, workers=2)
    loader = BratsData(str(tmp_path / "records"), batch_size=2, fold=0, num_folds=5, seed=0)
    x, y = finished(next(iter(loader.train_dataset())))
    assert x.shape == (2, 64, 64, 32, 4) and y.shape == (2, 64, 64, 32, 4)
    (ex, ey), = list(loader.eval_dataset())
    assert ex.shape == (1, 64, 64, 32, 4) and ey.numpy()[..., 1:].sum() > 0  # tumour in the window
