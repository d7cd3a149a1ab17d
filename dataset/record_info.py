"""`records.json`: what a folder of preprocessed records holds besides the records themselves.

Written by dataset/preprocess_data.py beside volume-<k>.tfrecord: the source layout, the input
channels (names in the tool's order) and the label convention (classes, names, regions). A folder
without it (records of the reference or of earlier versions) holds BraTS 2019–2021 data: four
channels in the brats2021 convention. No TensorFlow here: the command line reads it too.
"""
import json
import os
from dataclasses import dataclass

from common.errors import UserError
from dataset.conventions import CONVENTIONS, DEFAULT_CONVENTION, LabelConvention

FILE_NAME = "records.json"
DEFAULT_CHANNELS = ("t1", "t1ce", "t2", "flair")


@dataclass(frozen=True)
class RecordInfo:
    """A records folder's layout, channel names and LabelConvention."""
    layout: str
    channels: tuple
    convention: LabelConvention

    @property
    def n_channels(self):
        """The network's input channels."""
        return len(self.channels)

    def network_fields(self):
        """The settings this data fixes: {convention, in_channels, n_classes}."""
        return {"convention": self.convention.name, "in_channels": self.n_channels,
                "n_classes": self.convention.n_classes}


DEFAULT_INFO = RecordInfo("brats2021", DEFAULT_CHANNELS, CONVENTIONS[DEFAULT_CONVENTION])


def info_body(layout, channels, convention):
    """The JSON body of records.json."""
    return {"layout": layout, "channels": list(channels), "convention": convention.as_dict()}


def write_info(folder, layout, channels, convention):
    """Write folder/records.json."""
    with open(os.path.join(folder, FILE_NAME), "w") as handle:
        json.dump(info_body(layout, channels, convention), handle, indent=2)
        handle.write("\n")


def read_info(folder):
    """The RecordInfo of a records folder (DEFAULT_INFO without records.json); a damaged file or an
    unknown convention is a UserError naming it."""
    path = os.path.join(folder, FILE_NAME)
    try:
        with open(path) as handle:
            body = json.load(handle)
    except FileNotFoundError:
        return DEFAULT_INFO
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable ({err}); write the records again with "
                        "dataset/preprocess_data.py") from None
    try:
        name = body["convention"]["name"]
        channels = tuple(str(c) for c in body["channels"])
        layout = str(body["layout"])
    except (KeyError, TypeError):
        raise UserError(f"{path}: not a records description (layout, channels, convention); write "
                        "the records again with dataset/preprocess_data.py") from None
    if name not in CONVENTIONS or not channels:
        raise UserError(f"{path}: unknown label convention {name!r} (known: "
                        f"{', '.join(CONVENTIONS)}); write the records again with this version")
    return RecordInfo(layout, channels, CONVENTIONS[name])
