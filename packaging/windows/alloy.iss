; Inno Setup script: a per-user installer for the Windows build (dist\alloy\ from packaging\alloy.spec).
; Installs to %LOCALAPPDATA%\Programs\Alloy without administrator rights, adds a Start menu entry and
; registers .safetensors so a double-click opens the file in Alloy.
;
;   iscc /DAppVersion=0.1.0 packaging\windows\alloy.iss      -> dist\Alloy-0.1.0-setup.exe

#ifndef AppVersion
  #define AppVersion "0.1.0"
#endif
#define AppExe "alloy.exe"
#define ProgId "Alloy.safetensors"

[Setup]
AppId={{6F1D8A52-3B7C-4E0E-9C55-A11A0F0E5E21}
AppName=Alloy
AppVersion={#AppVersion}
AppPublisher=Alloy
DefaultDirName={localappdata}\Programs\Alloy
DefaultGroupName=Alloy
DisableProgramGroupPage=yes
PrivilegesRequired=lowest
ArchitecturesAllowed=x64compatible
ArchitecturesInstallIn64BitMode=x64compatible
OutputDir=..\..\dist
OutputBaseFilename=Alloy-{#AppVersion}-setup
SetupIconFile=..\..\resources\icons\alloy.ico
UninstallDisplayIcon={app}\{#AppExe}
Compression=lzma2/ultra64
SolidCompression=yes
ChangesAssociations=yes
WizardStyle=modern

[Files]
Source: "..\..\dist\alloy\*"; DestDir: "{app}"; Flags: ignoreversion recursesubdirs createallsubdirs

[Icons]
Name: "{userprograms}\Alloy"; Filename: "{app}\{#AppExe}"; Comment: "Merge fine-tuned neural-network checkpoints"
Name: "{userdesktop}\Alloy"; Filename: "{app}\{#AppExe}"; Tasks: desktopicon

[Tasks]
Name: "desktopicon"; Description: "Create a desktop shortcut"; Flags: unchecked

[Registry]
; .safetensors -> Alloy (per user, HKCU\Software\Classes); removed again on uninstall.
Root: HKA; Subkey: "Software\Classes\.safetensors\OpenWithProgids"; ValueType: string; ValueName: "{#ProgId}"; ValueData: ""; Flags: uninsdeletevalue
Root: HKA; Subkey: "Software\Classes\{#ProgId}"; ValueType: string; ValueName: ""; ValueData: "Safetensors model weights"; Flags: uninsdeletekey
Root: HKA; Subkey: "Software\Classes\{#ProgId}\DefaultIcon"; ValueType: string; ValueName: ""; ValueData: "{app}\{#AppExe},0"
Root: HKA; Subkey: "Software\Classes\{#ProgId}\shell\open\command"; ValueType: string; ValueName: ""; ValueData: """{app}\{#AppExe}"" ""%1"""
Root: HKA; Subkey: "Software\Classes\Applications\{#AppExe}\SupportedTypes"; ValueType: string; ValueName: ".safetensors"; ValueData: ""

[Run]
Filename: "{app}\{#AppExe}"; Description: "Start Alloy"; Flags: nowait postinstall skipifsilent
