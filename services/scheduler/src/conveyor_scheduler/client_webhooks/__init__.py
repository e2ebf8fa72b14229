"""Client webhooks inside the scheduler: endpoints, per-tenant signing secrets, durable deliveries.

* :class:`WebhookRpcs`: the five SchedulerService webhook RPCs (a mixin of the scheduler servicer);
* :func:`binding`: the ``DeliveryCoordinationService`` the notifier calls;
* :mod:`.models`: the tables (revision ``0002_webhooks``), on the scheduler's metadata.
"""

from conveyor_scheduler.client_webhooks import models
from conveyor_scheduler.client_webhooks.coordination import DeliveryCoordinationServicer, binding
from conveyor_scheduler.client_webhooks.rpcs import WebhookRpcs
from conveyor_scheduler.client_webhooks.settings import WebhookPolicy, WebhookSettings

__all__ = [
    "DeliveryCoordinationServicer",
    "WebhookPolicy",
    "WebhookRpcs",
    "WebhookSettings",
    "binding",
    "models",
]
