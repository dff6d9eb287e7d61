"""Which step a ``.wl`` file stands for, so that rewriting a file updates its step instead of adding one.

A file names its step by Study Instance UID plus Scheduled Procedure Step ID, as the HL7 intake keys
steps; a file that lacks one of them is known by its path inside the folder (a file renamed is then a
new step). The order a file's step lives in is the broker's own: its placer number is derived from the
identity under the issuer :data:`ORDER_ISSUER`, so file-made orders never collide with a RIS's.
"""

from __future__ import annotations

import hashlib
import uuid

ORDER_ISSUER = "WORKLIST-FILES"
"""Placer issuer of the orders made for worklist files (orders.placer_issuer)."""


def identity_of(study_instance_uid: str, sps_id: str, relative_path: str, folder: str = "") -> str:
    """``uid:<study>|<sps>`` when the file carries both, else ``file:<path relative to its folder>``,
    followed by ``@`` and a short hash of the folder when one is given: two watched folders may hold
    the same file name for different patients. A path too long for the column keeps its end and a
    hash of the whole (cutting it would make two long names one step)."""
    if study_instance_uid and sps_id:
        return f"uid:{study_instance_uid}|{sps_id}"
    name = relative_path
    if folder:
        name += "@" + hashlib.sha256(folder.encode("utf-8")).hexdigest()[:12]
    if len(name) > 195:
        name = hashlib.sha256(name.encode("utf-8")).hexdigest()[:40] + "~" + name[-154:]
    return f"file:{name}"


def order_number(identity: str) -> str:
    """The placer order number of the broker's order for an identity (stable: a hash of it)."""
    return "WL" + hashlib.sha256(identity.encode("utf-8")).hexdigest()[:30]


def derived_study_uid(identity: str) -> str:
    """A Study Instance UID for a file that has none (2.25 form, stable for the identity): the
    broker's steps are keyed by it. The file's own value is used whenever it has one."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'worklist-file:' + identity).int}"
