"""Ray job entrypoint for the rm stage:

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/rm.py CONFIG [key=value ...]

Inside a job the stage joins the job's cluster ($RAY_ADDRESS); everything else is the CLI's.
"""

import sys

from rlhf_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["rm", *sys.argv[1:]]))
