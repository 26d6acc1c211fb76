"""Cost of an execution: exact MACs/FLOPs per operator class, measured time and memory."""

from dynavit.cost.flops import CLASSES, MAC_CLASSES, count, total_macs
from dynavit.cost.profile import Profile, profile

__all__ = ["CLASSES", "MAC_CLASSES", "Profile", "count", "profile", "total_macs"]
