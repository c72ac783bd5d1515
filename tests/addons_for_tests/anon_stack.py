"""Test-only pipeline: set_acls (stand-in for the acl addon), anonymize, accesslog.

Used instead of addons/all.py so the anonymization tests depend on no other
addon's policy (the acl addon's default policy denies CONNECT to non-443 ports).
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

import set_acls  # noqa: E402
from addons import accesslog, anonymize  # noqa: E402

addons = [set_acls.SetAcls(), anonymize.Anonymize(), accesslog.AccessLog()]
