CREATE DATABASE apicurio OWNER newsroom;
