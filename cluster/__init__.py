"""From laptop to cluster: the Ray Jobs client behind `recllm submit` (job_submission.py) and the launch files for
Ray's AWS cluster launcher, KubeRay, SLURM, bare machines (start_ray_cluster.sh) and the nightly schedule."""
