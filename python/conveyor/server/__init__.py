"""The KServe v2 servers (HTTP and gRPC) over one data plane, and `conveyor serve`.

Importing the server plugs the rollout judge's check validation into config loading, so
a bad `[[rollout.checks]]` table is refused at load with its field named
(`rollout.checks[0].metric`).
"""

from conveyor.deploy.checks import validate_check_tables
from conveyor.rollout_config import register_checks_validator

register_checks_validator(validate_check_tables)
