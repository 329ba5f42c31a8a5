"""The launcher of ``hydra/launcher=slurm`` and ``slurm_ddp`` (conf/hydra/launcher/).
Hydra takes launchers only from the ``hydra_plugins`` package: the class is here, what it adds to
Hydra's submitit launcher is in coco_multilabel/sweeps/slurm.py."""

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

from coco_multilabel.sweeps import slurm


class SubmititSlurmLauncher(SlurmLauncher):
    """Hydra's submitit Slurm launcher, with job states from squeue where sacct cannot answer, and a
    job that reaches its time limit requeued to resume from its last.ckpt."""

    def launch(self, job_overrides, initial_job_idx):
        with slurm.jobs_followed_by_squeue():  # in the process that submits the jobs and awaits them
            return super().launch(job_overrides, initial_job_idx)

    def __call__(self, *args, **kwargs):
        slurm.handle_time_limit_signal_here()  # in the job, on its node, after submitit's own set-up
        result = super().__call__(*args, **kwargs)
        slurm.end_if_requeued()  # no result from an attempt Slurm requeued: submitit awaits the next one
        return result

    def checkpoint(self, *args, **kwargs):
        slurm.note_requeue(self.params)
        return super().checkpoint(*args, **kwargs)
