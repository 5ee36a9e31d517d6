# vmsynth: `make demo` and `make test` do all set-up on a fresh Debian 12 machine.
# Each step is quick when already done. `make help` lists the targets.

SHELL := /bin/bash
.DEFAULT_GOAL := help

# Debian's python3-guestfs is built for /usr/bin/python3, so the virtualenv is made from it
# with system site-packages; everything else comes from PyPI.
PYTHON_SYS := /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python -P
VMSYNTH := $(VENV)/bin/vmsynth
BUILD := .build
APT_PACKAGES := qemu-utils qemu-system-x86 busybox-static e2fsprogs fuse3 cpio xz-utils zstd \
	xdelta3 linux-image-amd64 libguestfs-tools python3-guestfs python3-venv python3-pip \
	iproute2 avahi-daemon avahi-utils dbus docker-registry apache2-utils
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

DEMO := $(BUILD)/demo
DEMO_HOME := $(DEMO)/home

.PHONY: help setup demo test test-fast fuzz bench budget clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 12

# docker-registry is for the tests, which start their own on 127.0.0.1: the service the
# package starts (on all interfaces) is stopped and disabled right after we install it.
$(BUILD)/apt.stamp: Makefile
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing || exit 1; \
		case " $$missing " in *" docker-registry "*) \
			if [ -d /run/systemd/system ]; then \
				$(SUDO) systemctl disable --now docker-registry.service >/dev/null 2>&1 || true; \
			else \
				$(SUDO) service docker-registry stop >/dev/null 2>&1 || true; \
				$(SUDO) update-rc.d docker-registry disable >/dev/null 2>&1 || true; \
			fi ;; \
		esac; \
	fi
	@mkdir -p $(BUILD) && touch $@

# The folders too: the strict editable install lists every module, so a module added or
# removed (a directory's mtime changes) needs the install again.
$(VENV)/.installed: pyproject.toml $(BUILD)/apt.stamp vmsynth vmsynth/service cli formats
	@[ -x $(VENV)/bin/python ] || $(PYTHON_SYS) -m venv --system-site-packages $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]' --config-settings editable_mode=strict
	@touch $@

setup: $(VENV)/.installed  ## install Debian packages and the virtualenv (.venv)

demo: setup  ## build a tiny VM; create, verify, inspect, apply an overlay; boot it; snapshot, resume
	bash fixtures/build-guest.sh $(DEMO)
	@rm -rf $(DEMO_HOME) $(DEMO)/app.vmo $(DEMO)/synth.qcow2 $(DEMO)/*.vmem $(DEMO)/*-run.qcow2*
	@export VMSYNTH_HOME=$(DEMO_HOME); set -e; \
	echo "== vmsynth base add"; \
	$(VMSYNTH) base add $(DEMO)/base.qcow2 --name demo-base --version 1.0; \
	echo "== vmsynth create"; \
	$(VMSYNTH) create --base demo-base@1.0 --disk $(DEMO)/app.qcow2 -o $(DEMO)/app.vmo; \
	echo "== vmsynth verify (with base and a 50 MiB budget)"; \
	$(VMSYNTH) verify $(DEMO)/app.vmo --base demo-base@1.0 --max-size 50M; \
	echo "== vmsynth inspect"; \
	$(VMSYNTH) inspect $(DEMO)/app.vmo; \
	echo "== vmsynth apply"; \
	$(VMSYNTH) apply $(DEMO)/app.vmo --base demo-base@1.0 -o $(DEMO)/synth.qcow2; \
	echo "== qemu-img compare app.qcow2 synth.qcow2"; \
	qemu-img compare $(DEMO)/app.qcow2 $(DEMO)/synth.qcow2; \
	qemu-img check -q $(DEMO)/synth.qcow2 && echo "qemu-img check: clean"; \
	echo "== vmsynth boot synth.qcow2 (the guest prints /marker.txt from the synthesized disk)"; \
	$(VMSYNTH) boot $(DEMO)/synth.qcow2 --kernel $(DEMO)/kernel --initrd $(DEMO)/initramfs.cpio.gz \
		--append "console=ttyS0 quiet panic=-1" --memory 256M --vnc none \
		--ready VMSYNTH-MARKER-END --serial - --timeout 120; \
	bash fixtures/demo-memory.sh $(DEMO) $(VMSYNTH)

test: setup  ## run the whole test suite (real qemu-img included)
	$(PY) -m pytest tests

test-fast: setup  ## the tests that need no external tool
	$(PY) -m pytest tests -m 'not qemu_img'

fuzz: setup  ## long mutation fuzzing: FUZZ examples per mutation family (default 2000, ~15 min)
	VMSYNTH_FUZZ_EXAMPLES=$(or $(FUZZ),2000) $(PY) -m pytest tests/test_fuzz.py -q -s

# BENCH picks the benchmarks (all by default, ~2-3 h as root); each writes its JSON and
# report under bench/, then bench/report.py assembles BENCHMARKS.md.
BENCH ?= disk debian memory e2e cloudlet arrive registry
bench: setup  ## benchmarks (BENCH="disk debian memory e2e cloudlet arrive registry"); BENCHMARKS.md
	@set -e; for b in $(BENCH); do case $$b in \
		disk) $(PY) bench/disk_bench.py ;; \
		debian) $(PY) bench/disk_bench.py --workload debian ;; \
		memory) $(PY) bench/memory_bench.py ;; \
		e2e) $(PY) bench/e2e_bench.py --debian ;; \
		cloudlet) $(PY) bench/cloudlet_bench.py --debian ;; \
		arrive) $(PY) bench/cloudlet_bench.py --arrive ;; \
		registry) $(PY) bench/registry_bench.py ;; \
		*) echo "unknown benchmark $$b (disk, debian, memory, e2e, cloudlet, arrive, registry)"; exit 2 ;; \
	esac; done
	$(PY) bench/report.py

# A CI gate: fails (exit 11) when an overlay is over budget, 13 when it is damaged.
#   make budget OVERLAY=app.vmo MAX=250M [BASE=ubuntu-22.04@2.3.1]
budget: setup  ## check OVERLAY against MAX (and BASE if given)
	@[ -n "$(OVERLAY)" ] && [ -n "$(MAX)" ] || { echo "usage: make budget OVERLAY=file MAX=250M [BASE=...]"; exit 2; }
	$(VMSYNTH) verify $(OVERLAY) --max-size $(MAX) $(if $(BASE),--base $(BASE))

clean:  ## remove built images and the virtualenv
	rm -rf $(BUILD) $(VENV) build *.egg-info
