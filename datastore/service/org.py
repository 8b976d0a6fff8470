"""Departments and projects (the department/project access-control model) over HTTP.

Members of a department read (and, when allowed, modify) its data; project access is
read-only and crosses departments. Admins manage department access; admins and a project's
PI manage project access. Registered users see projects as existence stubs (ID, name, owner,
status).
"""

from __future__ import annotations

from sqlalchemy import select

from labvault import policies as p
from labvault.datastore import operations as ops
from labvault.datastore.models import Institution, Project

from . import views
from .handlers import BaseAPIHandler


class ProjectsHandler(BaseAPIHandler):
    """Projects as existence stubs: ID, name, owner and status (stub.existence)."""

    def get(self):
        with self.sessions() as s:
            subject, names, out = self.subject(s), views.NameCache(s), []
            rows = s.execute(select(Project, Institution.name).join(Institution, Institution.id == Project.institution_id)
                             .order_by(Institution.name, Project.name)).all()
            for proj, inst in rows:
                value = p.Project(proj.id, proj.pi_id, proj.institution_id)
                if self.service.policy.decide(subject, "stub", value, self.now).allowed:
                    out.append({"id": proj.id, "name": proj.name, "institution": inst,
                                "pi": names.person(proj.pi_id), "status": proj.status,
                                "member": proj.id in subject.projects})
            self.write_json({"projects": out})


class ProjectMembersHandler(BaseAPIHandler):
    """Give someone read-only access to a project (its PI or an admin)."""

    def post(self, name):
        body = self.json_body()
        user = self.field(body, "user")
        institution = self.field(body, "institution", required=False)
        self.run_op(ops.grant_project_access, name, user, institution=institution)
        self.write_json({"project": name, "user": user, "access": "read"}, 201)


class DepartmentMembersHandler(BaseAPIHandler):
    """Give someone access to a department's data: read, or read and modify (admins)."""

    def post(self, name):
        body = self.json_body()
        user = self.field(body, "user")
        modify = self.field(body, "modify", bool, required=False) or False
        institution = self.field(body, "institution", required=False)
        if institution is None:
            with self.sessions() as s:
                inst = s.get(Institution, self.lv_user.institution_id) if self.lv_user.institution_id else None
                institution = inst.name if inst else ""
        self.run_op(ops.add_membership, user, institution, name, modify=modify)
        self.write_json({"department": name, "institution": institution, "user": user,
                         "access": "modify" if modify else "read"}, 201)


ROUTES = [
    ("/projects", ProjectsHandler),
    ("/projects/{name}/members", ProjectMembersHandler),
    ("/departments/{name}/members", DepartmentMembersHandler),
]
