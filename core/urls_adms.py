"""The paths pushing clocks call, under /iclock/ at the web root: exactly as the
firmware writes them, with `.aspx` (eSSL and BioMax firmware) or a trailing
slash accepted too, so no request is ever redirected."""

from django.urls import re_path

from core import views_adms

urlpatterns = [
    re_path(r"^cdata(?:\.aspx)?/?$", views_adms.cdata, name="adms-cdata"),
    re_path(r"^getrequest(?:\.aspx)?/?$", views_adms.getrequest, name="adms-getrequest"),
    re_path(r"^devicecmd(?:\.aspx)?/?$", views_adms.devicecmd, name="adms-devicecmd"),
    re_path(r"^ping(?:\.aspx)?/?$", views_adms.ping, name="adms-ping"),
]
