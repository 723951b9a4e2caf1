from django.conf import settings
from rest_framework.pagination import LimitOffsetPagination


class Pagination(LimitOffsetPagination):
    """?limit= and ?offset=; at most API_MAX_PAGE_SIZE rows a page."""

    @property
    def max_limit(self) -> int:
        return settings.API_MAX_PAGE_SIZE
