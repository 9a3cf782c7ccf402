"""A tenant's view of user ids, job ids and idempotency keys: what it may name, see and reuse.

The store keeps a named tenant's user ``alice`` as ``acme+alice`` (``+`` is in no user id and no
tenant name), so two tenants may each have ``alice`` and neither can name the other's: a caller
only ever names ids in its own namespace. What goes back to a caller (ids, error texts) is shown
without the prefix. A service key (the trainer calling RefreshUser) sees stored ids as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from easyphoto.rpc.errors import EasyPhotoError, NotFound
from easyphoto.rpc.tenants import Tenant

from .store import TENANT_SEPARATOR, check_stored_id, check_user_id


@dataclass(frozen=True)
class Namespace:
    tenant: str = ""  # "": the one tenant of an open server
    everything: bool = False  # a service key: every tenant's stored ids

    @classmethod
    def of(cls, tenant: Tenant) -> Namespace:
        return cls(tenant.name, tenant.service)

    @property
    def _prefix(self) -> str:
        return f"{self.tenant}{TENANT_SEPARATOR}" if self.tenant else ""

    def user(self, user_id: str, field: str) -> str:
        """The stored id of the user the caller names (checked: InvalidArgument naming ``field``)."""
        if self.everything:
            check_stored_id(user_id, field)
            return user_id
        check_user_id(user_id, field)
        return self._prefix + user_id

    def owns(self, stored_id: str) -> bool:
        if self.everything:
            return True
        if self.tenant:
            return stored_id.startswith(self._prefix)
        return TENANT_SEPARATOR not in stored_id

    def shown(self, stored_id: str) -> str:
        """The id as the caller names it."""
        return stored_id.removeprefix(self._prefix) if self._prefix else stored_id

    def request_id(self, request_id: str) -> str:
        """An idempotency key kept apart from other tenants' same key."""
        return self._prefix + request_id if request_id and not self.everything else request_id

    def listing(self) -> str | None:
        """The tenant whose jobs a listing holds (``JobStore.list``); None: every tenant's."""
        return None if self.everything else self.tenant

    def job_of(self, stored_user_id: str, job_id: str) -> None:
        """NotFound unless the caller owns the job (another tenant's job does not exist for it)."""
        if not self.owns(stored_user_id):
            raise NotFound(f"no job {job_id!r}", field="job_id")

    def outward(self, error: EasyPhotoError) -> EasyPhotoError:
        """The error with stored ids shown as the caller names them."""
        if self._prefix:
            error.message = error.message.replace(self._prefix, "")
            error.metadata = {k: v.replace(self._prefix, "") for k, v in error.metadata.items()}
        return error
