"""Many runs in one process: members of a sweep trained as one block, each its own W&B run
(`harness train-packed`, launched by the local controller with --pack)."""
