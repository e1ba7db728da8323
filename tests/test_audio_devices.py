"""Choosing sound devices, with a fake `sounddevice` (PortAudio's device list); the real one is
tested in test_local_device.py."""

import sys

import pytest
from fake_audio import FakeSoundDevice

from moshi_mlx.audio import devices as audio_devices
from moshi_mlx.audio.devices import AudioDeviceError, find_device


@pytest.fixture
def fake_sd(monkeypatch):
    return lambda **kwargs: FakeSoundDevice.install(monkeypatch, **kwargs)


def test_devices_by_default_number_or_name(fake_sd):
    fake_sd(default=(4, 3))
    assert find_device(None, "input") == 4 and find_device(None, "output") == 3
    assert find_device("1", "input") == 1
    assert find_device("headset", "input") == 1
    assert find_device("usb", "output") == 2  # the headset has no output
    assert find_device("PULSE", "output") == 3


@pytest.mark.parametrize("spec, kind, problem", [
    ("9", "input", "--input-device 9: there is no input device with that number"),
    ("2", "input", "--input-device 2: there is no input device with that number"),
    ("nothing", "output", "--output-device 'nothing': no output device has that name"),
    ("usb", "input", None),  # one input only: fine
    ("u", "input", "matches several input devices"),
])
def test_a_bad_device_is_named_and_the_devices_listed(fake_sd, spec, kind, problem):
    fake_sd()
    if problem is None:
        assert find_device(spec, kind) == 1
        return
    with pytest.raises(AudioDeviceError) as e:
        find_device(spec, kind)
    assert problem in str(e.value)
    assert "0 HDA Intel: ALC (hw:0,0)" in str(e.value) and "4 default" in str(e.value)


def test_a_device_that_cannot_do_24_khz(fake_sd):
    fake_sd(rates=(44100, 48000))
    with pytest.raises(AudioDeviceError) as e:
        find_device("0", "input")
    message = str(e.value)
    assert "input device 0 (HDA Intel: ALC (hw:0,0)) cannot stream 24000 Hz mono" in message
    assert "Invalid sample rate" in message and "4 default" in message


def test_no_devices(fake_sd):
    fake_sd(devices=[])
    with pytest.raises(AudioDeviceError, match="no audio input device found") as e:
        find_device(None, "input")
    assert "No audio devices found" in str(e.value)
    fake_sd(devices=[("USB Speaker", 0, 2)], default=(-1, 0))
    with pytest.raises(AudioDeviceError, match="no audio input device found"):
        find_device(None, "input")
    fake_sd(default=(-1, 0))
    with pytest.raises(AudioDeviceError, match="no default audio input device"):
        find_device(None, "input")


def test_no_portaudio(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", None)
    with pytest.raises(AudioDeviceError, match="cannot load PortAudio.*libportaudio2"):
        audio_devices.device_table()


